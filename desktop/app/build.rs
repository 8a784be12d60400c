fn main() {
    // Embeds tauri.conf.json, the capabilities and the icon; generates the ACL manifests.
    tauri_build::build()
}
