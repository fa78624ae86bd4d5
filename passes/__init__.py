"""Built-in passes, one per file; the file name is the pass name (see fxcompress.registry)."""
