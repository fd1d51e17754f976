"""Development tools: the import graph (imports.py) and the demo models' generator
(demo_models.py). Not part of the installed package."""
