"""ragft serve: Ray Serve deployments for retrieval + generation behind an OpenAI-compatible API."""
