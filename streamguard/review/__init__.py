"""Human review around the verdict: which verdicts a person should see (`route`), and applying their
decisions back to the stream, the verdict cache and the hash banks (`apply`, `consumer`)."""
