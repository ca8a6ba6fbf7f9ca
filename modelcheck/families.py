"""Layer families: the names capture gives each layer's kind, and rules reason with.

Plain strings, free of torch, so that the rules stage (and listing or explaining rules)
can name them without importing the capture stage.
"""

ACTIVATION_FAMILIES = frozenset(
    {
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "gelu",
        "silu",
        "softplus",
        "tanh",
        "sigmoid",
        "hardtanh",
    }
)
