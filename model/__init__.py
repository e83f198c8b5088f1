"""The model: ResNet encoder + VADeR FPN decoder and projection heads (``network``), the objectives
(``objectives``), the MoCo machinery of queues and momentum encoder (``builder``), the losses (``losses``) and
checkpoint files that carry the model's configuration (``checkpoint``). Imports nothing of the project above it."""
