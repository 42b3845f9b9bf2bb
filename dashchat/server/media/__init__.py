"""Media that requests point at: image URLs fetched under the operator's policy, `data:` URLs decoded."""
