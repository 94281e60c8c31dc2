"""Finding, loading and placing the model: weights, memory plan, speed switches, test builders."""
