"""What a prediction returns: the image files and their parameters text."""
