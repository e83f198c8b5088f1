"""Launching training on Slurm with submitit (``python -m densessl.slurm.submit``): one task per GPU, checkpoint and
requeue on preemption; ``local_cluster.sh`` starts a real two-node Slurm on loopback for tests."""
