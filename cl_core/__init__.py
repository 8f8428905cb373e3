"""Continual-learning core: methods, metrics and the pieces they share."""
