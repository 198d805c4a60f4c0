"""What a client sends, checked: the request, its images, file inputs and prompt syntax."""
