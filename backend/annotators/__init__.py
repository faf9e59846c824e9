"""Annotators: canvas layer -> control image.  A typed registry that knows no annotator
(registry), the weight-free ones (builtin), the controlnet-aux wrappers (aux), the two
registered explicitly on first use (library), and control images for a request (controls)."""
