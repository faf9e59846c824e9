"""The diffusers engine, split as diffusers itself is: samplers, geometry, the model cache,
control units, pipelines, and the engine that runs them (engine)."""
