"""stn-deploy: train a Spatial Transformer Network classifier and ship it, verified."""

__version__ = "0.1.0"
