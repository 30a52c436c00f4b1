"""Shared pieces of the stages: params, io, errors (and later models, labelers, metrics)."""
