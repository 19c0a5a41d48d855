"""The pure core: policy, classification, plan, rendering, errors.

No disk, no clock, no environment, no threads, no logging: values in, values
out. May import only itself (and pydantic for the policy schema); every
other room of ocrd may import it.
"""
