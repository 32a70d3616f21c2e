"""Model builders and loaders: the tiny test VLM, VLM loading and visual features."""
