"""Server-rendered pages for creators. They call services directly, never the JSON API."""
