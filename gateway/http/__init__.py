"""The KServe V2 HTTP/REST adapter (with Triton's binary tensor extension): an HTTP/1.1
server on the serving loop, the REST codec and the endpoints over the pipeline. May import
pipeline and every wing below it; never wire (its peer) or process."""
