"""Serving: the pair answering requests (generation) and the engine that schedules them."""
