"""Data and prediction monitoring: sampled live inputs and outputs per model version,
their statistics over sliding windows, reference profiles and drift scores.

Wing position: after models, before pipeline (models < monitoring < pipeline). It reads
served versions, routing and shadow figures from gateway.models; the pipeline knows it only
as a post-inference hook that the server wiring registers."""
