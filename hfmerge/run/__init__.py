"""One merge, start to end: the pipeline, its stages and the step that writes a planned merge to a folder."""
