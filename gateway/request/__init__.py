"""The request wing: the values every transport, the pipeline and the runtime wrappers share
(context, decoded request, inference, headers read, the in-flight cap). May import: tenancy,
quota and the foundation modules."""
