"""Checkpoints: verified files, what they hold (the Checkpointer), and how a start resumes from one."""
