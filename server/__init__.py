"""`codetune serve`: a registered model behind HTTP, on Ray Serve."""
