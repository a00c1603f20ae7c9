"""Pretext tasks. Each task builds its own masked inputs from a batch, runs the
model and returns a :class:`~opt.tasks.base.TaskOutput` (loss and metrics);
:class:`~opt.tasks.mixture.TaskMixture` combines them."""
