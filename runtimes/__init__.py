"""Runtimes execute one model version: the Runtime interface and its implementations.

Imports model_store value types and numpy; never gateway."""
