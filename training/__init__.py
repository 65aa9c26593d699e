"""Training, datasets and evaluation for InstructSAM (no ROS)."""
