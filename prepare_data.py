"""Data preparation: tokenizers, the on-disk format, dataset preparers."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message as one line on stderr and exits 2.

    It lives here, at the bottom of the import chain (model <- prepare_data <- train <- sample <- cli),
    so every layer that checks user input can raise it.
    """
