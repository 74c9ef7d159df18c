"""The gRPC adapter: the edge that wraps every handler, the servicer, the wire codec and
the RPC observer. May import the pipeline and every wing below it."""
