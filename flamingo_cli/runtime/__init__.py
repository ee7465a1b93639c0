"""What training and evaluation share: the run directory, checkpoint reading, launch."""
