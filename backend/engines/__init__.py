"""Engines turn a validated request and its images into images: the protocol (base), the
factory (factory), FakeEngine (fake), the model catalogue (catalogue), tiny random-weight
models (tiny), and the diffusers engine (diffusers/; the only importer of torch here)."""
