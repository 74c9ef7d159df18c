"""The gRPC adapter: the edge that wraps every handler, the servicer, ModelStreamInfer (stream),
the wire codec and the RPC and stream observers. May import the pipeline and every wing below it."""
