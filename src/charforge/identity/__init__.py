"""A character's identity beyond its checkpoint: reference images, conditioning, a measured score,
and SillyTavern cards."""
