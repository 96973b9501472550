"""slimstep: rectified-flow teacher compressed into small one-step students."""
