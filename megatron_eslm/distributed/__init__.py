"""Launch, counted collectives and gradient synchronisation across ranks."""
