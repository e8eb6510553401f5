"""MLX builds, run by mlx-lm (Apple Silicon's own runtime; mlx[cpu] on Linux): the folder layout as data
(which plan reads too), the streamed quantizing writer and the runner.

May import: the shared core (edgeqwen.*) and the formats table; never another format's folder, measure, serve
or cli.
"""
