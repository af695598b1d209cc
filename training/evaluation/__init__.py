"""Held-out evaluation: the driver that scores every objective's metric (`evaluator`) and the local `evaluate`
metric modules it loads (`metrics`)."""
