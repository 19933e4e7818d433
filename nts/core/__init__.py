"""The association core: one sans-IO request pipeline shared by every authentication mode."""
