"""Hand-written kernels: optimised formulations of the extensions' plain code.

Each kernel computes exactly what a plain formulation elsewhere in the package computes (the plain
one is the definition and the reference its tests compare against) and is selected by an option:

- :mod:`.inti_cpu` -- the InTI layer as four fused ``torch.autograd.Function`` s with written-out
  backward passes, the default for eager execution on the CPU (``InTIConfig.kernel``).
"""
