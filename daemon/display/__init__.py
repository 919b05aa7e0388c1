"""What the bedside sees: the fullscreen GL display, or a headless status sink."""
