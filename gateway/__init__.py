"""Everything that serves: settings, CLI, server wiring, the servicer, protobuf-tensor
conversion, model management and execution wrappers."""
