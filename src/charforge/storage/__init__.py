"""Where image files live: local disk under the data dir, written atomically."""
