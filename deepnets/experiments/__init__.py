"""Experiments that explain why deep nets work; run one with `python -m deepnets.experiments NAME`."""
