"""The model: ResNet encoder and the heads methods use (``network``), one module per method and their registry
(``methods``), the MoCo machinery of queues and momentum encoder (``builder``), shared loss pieces (``losses``),
the feature picture (``pictures``) and checkpoint files that carry the model's configuration, read weights only
(``checkpoint``). Imports nothing of the project above it."""
