"""What the ``segment`` command prints for other programs (the Slicer module's background job).

Only the standard library: the Slicer side imports this without torch.
"""

PROGRESS_PREFIX = "DIFFUSIONSEG_PROGRESS "  # + {"stage": ..., "done": ..., "total": ...} on stdout
WARNING_PREFIX = "diffusionseg: warning: "  # + one way the input does not fit the model, on stderr
ESTIMATE_PREFIX = "diffusionseg: estimate: "  # + "sampling will take ...", on stderr
ERROR_PREFIX = "diffusionseg: error: "  # + the reason of a refusal or failure, on stderr
