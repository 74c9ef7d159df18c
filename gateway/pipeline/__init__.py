"""The transport-free inference pipeline every adapter calls, and the in-flight cap. May
import models and every wing below it; never an adapter (wire) or process."""
