"""Reads Triton-style model repositories: layout, config.pbtxt, version policy.

Pure: imports nothing from runtimes or gateway and runs no server.
"""
