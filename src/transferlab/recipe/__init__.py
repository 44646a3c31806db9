"""The training stage: everything checked (plan), then phase 1 and phase 2 on the Lightning Trainer and the
finish; the Learner takes the same steps one at a time."""
