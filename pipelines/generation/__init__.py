"""What one picture is: the request, prompts, samplers, the text-to-image pipeline and its previews."""
