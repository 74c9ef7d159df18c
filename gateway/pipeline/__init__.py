"""The transport-free inference pipeline every adapter calls, and what a tenant may learn (the
catalog). May import models and every wing below it; never an adapter (wire) or process."""
