"""Benchmarks (``controlcanvas bench NAME``): the list (main), a server in a child process
(process), the engine, soak and training benches."""
