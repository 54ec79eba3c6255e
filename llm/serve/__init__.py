"""Serving: KV pages and (to come) the scheduler, the engine and the HTTP server. It
shares the model, the logical-axis rules and the samplers with training and never
imports the training program."""
