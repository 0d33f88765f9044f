fn main() -> anyhow::Result<()> {
    specforge_rs::cli::main()
}
